"""MPNet text encoders (all-mpnet-base-v2): one text tower whose blocks share one relative-position bias."""

import torch
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

from lmmc.adapters import Adapter, BlockLayout, HiddenLayout, TowerSpec
from lmmc.adapters.bert import embed_sentences


class HeadSubsetAttention(MPNetSelfAttention):
    """MPNet self-attention after some of its heads were removed.

    The encoder computes one relative-position bias [batch, teacher heads, query, key] for every block;
    this block adds the rows of the heads it kept, listed in the `bias_heads` buffer, which the student's
    weights file carries."""

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        if position_bias is not None:
            position_bias = position_bias.index_select(1, self.bias_heads)
        return super().forward(hidden_states, attention_mask, position_bias, output_attentions, **kwargs)


def _keep_heads(block, heads: torch.Tensor) -> None:
    attn = block.attention.attn
    if not isinstance(attn, HeadSubsetAttention):
        every = torch.arange(attn.q.out_features // attn.attention_head_size, device=attn.q.weight.device)
        if torch.equal(heads.to(every.device), every):
            return  # all heads, in order: the block stays a plain MPNet block, as a reloaded one will be
        attn.__class__ = HeadSubsetAttention
        attn.register_buffer("bias_heads", every)
    attn.bias_heads = attn.bias_heads.index_select(0, heads.to(attn.bias_heads.device))


_LAYOUT = BlockLayout(
    q=("attention.attn.q",), k=("attention.attn.k",), v=("attention.attn.v",), o=("attention.attn.o",),
    fc1=("intermediate.dense",), fc2=("output.dense",),
)

ADAPTERS = (
    Adapter(
        family="mpnet",
        model_types=("mpnet",),
        towers=(TowerSpec("text", "text", ("encoder.layer",), _LAYOUT, None, embed_sentences,
                          HiddenLayout("embeddings", ("output.LayerNorm",)), keep_heads=_keep_heads),),
        auto_class="AutoModel",
        task_metric="neighbour",
        sentence_pooling=True,
    ),
)
