"""What each `captioner` subcommand does once its arguments are parsed (captioner.cli parses them)."""
