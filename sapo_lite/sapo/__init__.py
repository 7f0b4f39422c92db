"""sapo"""
