"""Loading models and making them trainable: bases, fine-tuning methods, eval's one base, the trainers."""
