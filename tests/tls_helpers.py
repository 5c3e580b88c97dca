"""Test certificates: lab.pki (shared with bench/ and the demo)."""

from lab.pki import Leaf, Pki

__all__ = ["Leaf", "Pki"]
