"""Switchyard's base layer: every other package (models, pretrain, eval, bench) may import it, and it imports none of them."""
