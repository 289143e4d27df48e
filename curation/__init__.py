"""Curation: PMC figure-caption sources to modality-filtered alignment and instruction sets."""
