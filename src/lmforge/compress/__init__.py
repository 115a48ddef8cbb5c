"""lmforge.compress"""
