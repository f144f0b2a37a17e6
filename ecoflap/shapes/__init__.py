"""The synthetic shapes world of the shipped model: scenes, questions, tokenizer, scoring.

Data the library may use (to score the shipped model, to make examples); the trainer,
the model card and the asset writer live above the library, in `ecoflap.toy`.
"""
