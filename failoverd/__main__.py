from failoverd.cli.daemon import main

raise SystemExit(main())
