"""One LightningModule per SigLIP 2 stage, each a thin composition of `siglip2` pieces."""
