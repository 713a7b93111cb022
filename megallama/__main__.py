from megallama.cli import entry

entry()
