"""The top-level commands that are not a pipeline step (check, chat, convert, demo) and the code
only they use. The core they drive lives in `medllava/`; `medllava.cli` lists every command."""
