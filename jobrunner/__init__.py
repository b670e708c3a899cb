"""The jobrunner: processes ONE claimed job attempt (download, probe, encode once, transcribe,
upload, record) and exits with a code the controller understands."""
