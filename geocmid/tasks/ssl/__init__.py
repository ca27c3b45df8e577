"""tasks/ssl"""
