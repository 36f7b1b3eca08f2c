"""mm.datasets"""
