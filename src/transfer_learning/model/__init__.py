"""Model: backbones (pretrained body + new head), preprocessing, strategies, the LightningModule."""
