from pipeq.cli.main import main

raise SystemExit(main())
