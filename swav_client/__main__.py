from swav_client.cli import main

main()
