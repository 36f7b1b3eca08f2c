"""mm.adapters"""
