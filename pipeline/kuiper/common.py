"""Names shared by the Kuiper stages (kept apart from format.py, which imports numpy: planning
must not). Stage modules import this, never each other."""

RUNTIME = "kuiper"  # the target runtime every Kuiper stage serves
EXPORT, VERIFY, PERPLEXITY = "kuiper.export", "kuiper.verify", "kuiper.perplexity"
MODEL_FILE = "model_int8.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
