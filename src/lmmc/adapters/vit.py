"""ViT image encoders: one vision tower whose pooled embedding is the final [CLS] state."""

from lmmc.adapters import Adapter, BlockLayout, TowerSpec


def _embed(model, inputs):
    # ViTModel's pooler is a tanh head that pretrained checkpoints often leave untrained; the
    # normalised [CLS] state is what downstream heads read.
    hidden = model(pixel_values=inputs["pixel_values"]).last_hidden_state
    return hidden, hidden[:, 0]


_LAYOUT = BlockLayout(
    q=("attention.q_proj", "attention.attention.query"),
    k=("attention.k_proj", "attention.attention.key"),
    v=("attention.v_proj", "attention.attention.value"),
    o=("attention.o_proj", "attention.output.dense"),
    fc1=("mlp.fc1", "intermediate.dense"),
    fc2=("mlp.fc2", "output.dense"),
)

ADAPTERS = (
    Adapter(
        family="vit",
        model_types=("vit",),
        towers=(TowerSpec("vision", "image", ("layers", "encoder.layer", "encoder.layers"), _LAYOUT, None, _embed),),
        auto_class="AutoModel",
        task_metric="neighbour",
    ),
)
