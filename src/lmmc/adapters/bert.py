"""BERT-family text encoders (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT): one text tower."""

from lmmc.adapters import Adapter, BlockLayout, HiddenLayout, TowerSpec
from lmmc.pooling import modes_of, pool


def embed_sentences(model, inputs):
    # The sentence embedding as the model's sentence-transformers modules pool it (the teacher's
    # modules.json, carried in its config); the masked mean, as MiniLM's, for a BERT without one.
    # A BERT configured as a decoder would build a key/value cache, which OpenVINO's PyTorch frontend cannot
    # convert and an embedding never reads.
    cache = {"use_cache": False} if getattr(model.config, "is_decoder", False) else {}
    hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **cache).last_hidden_state
    return hidden, pool(hidden, inputs["attention_mask"], modes_of(model.config))


_BERT_LAYOUT = BlockLayout(
    q=("attention.self.query",), k=("attention.self.key",), v=("attention.self.value",),
    o=("attention.output.dense",), fc1=("intermediate.dense",), fc2=("output.dense",),
)
_DISTIL_LAYOUT = BlockLayout(
    q=("attention.q_lin",), k=("attention.k_lin",), v=("attention.v_lin",),
    o=("attention.out_lin",), fc1=("ffn.lin1",), fc2=("ffn.lin2",),
)

ADAPTERS = (
    Adapter(
        family="bert",
        model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        towers=(TowerSpec("text", "text", ("encoder.layer",), _BERT_LAYOUT, None, embed_sentences,
                          HiddenLayout("embeddings", ("output.LayerNorm",))),),
        auto_class="AutoModel",
        task_metric="neighbour",
        sentence_pooling=True,
    ),
    Adapter(
        family="distilbert",
        model_types=("distilbert",),
        towers=(TowerSpec("text", "text", ("transformer.layer",), _DISTIL_LAYOUT, None, embed_sentences,
                          HiddenLayout("embeddings", ("output_layer_norm",))),),
        auto_class="AutoModel",
        task_metric="neighbour",
        sentence_pooling=True,
    ),
)
