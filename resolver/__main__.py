from resolver.cli import main

main(prog_name="dnsguard")
