"""nanorl-plugin-gsm8k: GSM8K grade-school math with a calculator tool."""
