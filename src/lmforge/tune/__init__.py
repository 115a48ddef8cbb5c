"""lmforge.tune"""
