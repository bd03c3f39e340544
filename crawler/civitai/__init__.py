"""Civitai's API as the harvester knows it: one `Endpoint` value per endpoint (`images.IMAGES`)."""
