from labeler_service.cli import main

main()
