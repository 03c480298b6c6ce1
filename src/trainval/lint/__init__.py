"""`trainval lint`: static checks for the classic mistakes of hand-written training loops."""
