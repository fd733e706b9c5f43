"""Small random HuggingFace ViViTs, made the way real checkpoints are saved."""

import torch
import transformers


def random_hf_vivit(
    *, frames: int = 8, size: int = 32, hidden: int = 64, layers: int = 3, labels: int = 10
) -> transformers.VivitForVideoClassification:
    """A random tubelet-(2, 8, 8) ViViT in eval mode, eager attention, 4 heads, MLP 2x wide.

    HF initialises the class token and position embeddings to zeros or tiny values; they are
    redrawn here so that a conversion that drops or misplaces them cannot pass.
    The classifier is scaled up for the same reason.
    """
    torch.manual_seed(0)
    config = transformers.VivitConfig(
        image_size=size,
        num_frames=frames,
        tubelet_size=[2, 8, 8],
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        num_labels=labels,
        attn_implementation="eager",
    )
    model = transformers.VivitForVideoClassification(config).eval()
    with torch.no_grad():
        model.vivit.embeddings.cls_token.normal_()
        model.vivit.embeddings.position_embeddings.normal_(std=0.5)
        # A head with O(1) logits, so that a 1e-4 tolerance separates the merging modes.
        model.classifier.weight.normal_(std=1.0)
    return model
