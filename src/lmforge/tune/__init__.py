"""Hyperparameter search (`lmforge tune`): Optuna studies whose trials are stage runs.

space (search spaces over dotted config keys), study (storage, heartbeats, samplers, pruners),
stage (kind "tune": the trial objective and the stage), results (table, best config, plots).
"""
