"""The chest X-ray dataset factory: every step of the workflow as importable, tested Python."""
