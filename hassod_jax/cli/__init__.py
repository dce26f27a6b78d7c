"""The command line around the modes: flags and their checks (`flags`), `--help` (`help`),
user errors shown as one line (`errors`), log.txt and config.json (`run_files`)."""
