"""The CLI's commands that are neither training nor evaluation: convert, export, merge, mine, synth, info."""
