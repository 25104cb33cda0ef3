from varctl.cli import main

raise SystemExit(main())
