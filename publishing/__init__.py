"""Publishing a trained NanoVLM: its model card (`model_card`) and the push to the Hugging Face Hub (`push_to_hub`)."""
