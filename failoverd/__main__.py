from failoverd.cli import main

raise SystemExit(main())
