"""Print pip constraints pinning every `>=` lower bound of setup.cfg's install_requires (torch excepted: CI installs
the CPU build of the one torch the README names). CI installs with them to test the oldest releases we claim."""

import configparser
import re
import sys

config = configparser.ConfigParser()
config.read(sys.argv[1] if len(sys.argv) > 1 else "setup.cfg")
for requirement in config["options"]["install_requires"].split():
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([^,]+)(,.*)?", requirement)
    if match is None:
        sys.exit(f"install_requires entry {requirement!r} has no `>=` lower bound; every dependency needs one")
    if match.group(1) != "torch":
        print(f"{match.group(1)}=={match.group(2)}")
