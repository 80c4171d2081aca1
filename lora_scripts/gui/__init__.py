"""`lora-scripts gui`: the local web app (docs/gui.md). A client of the library: every page calls the
functions the CLI calls (config schema, check, captions, generate) and watches runs through their output
folders; nothing here re-implements them.
"""
