"""lmforge.evals"""
