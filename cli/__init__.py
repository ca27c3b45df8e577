"""The geocmid command line: parse options, call the library, report. Installed as geocmid_cli."""
