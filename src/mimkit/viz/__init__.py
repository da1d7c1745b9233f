"""Pictures: reconstructions, masks, saliency, attention."""
