"""Medical VQA metrics as pure functions, in two families.

`llava_med`: LLaVA-Med's published scorer, quirks included, for comparison with its tables.
`strict`: first-choice closed accuracy, normalized exact match and token F1.
`stats`: seeded bootstrap intervals. `bleu`: NLTK-compatible sentence BLEU.
"""
