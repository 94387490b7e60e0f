from chipwise.cli import main

raise SystemExit(main())
