"""Offline checks of crewmesh's deployment artefacts (Helm chart, Terraform, Compose).

Run through ``scripts/validate-deploy``; ``python -m deploy_checks --help`` for options.
"""
