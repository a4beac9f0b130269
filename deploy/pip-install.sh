#!/bin/sh
# pip install with what the build was given as secrets (deploy/Dockerfile): a pip configuration
# (pip_conf) and a CA bundle (ca_bundle), each used only if present. Nothing is hard-coded.
set -eu
if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi
if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi
exec pip install "$@"
