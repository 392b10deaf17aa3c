"""vla-scale"""
