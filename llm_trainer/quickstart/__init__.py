"""`llm-trainer quickstart`: the whole pipeline on a synthetic arithmetic task the library generates itself."""
