from selectune.cli import main

raise SystemExit(main())
