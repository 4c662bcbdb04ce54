"""Shared test helpers (importable from test modules: pytest puts tests/ on sys.path)."""


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    settings = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128)
    return BertConfig(**{**settings, **overrides})


def sweep_args(backbone, data_file, /, **overrides):
    return {"backbone": str(backbone), "data_file": str(data_file), "text_column": "review",
            "label_column": "sentiment", "rates": [0.5], "methods": ["grad_x_act", "random"], "prompt_length": 4,
            "max_length": 24, "train_steps": 6, "retune_steps": 4, "attribution_examples": 16,
            "experiment": "test-sweep", **overrides}
