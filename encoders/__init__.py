"""mm.encoders"""
