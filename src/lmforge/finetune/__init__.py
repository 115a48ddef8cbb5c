"""lmforge.finetune"""
