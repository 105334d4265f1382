"""Regenerate the README's results section."""
def add_arguments(p): pass
def validate(a): return None
def run(a): return 0
