from imgfeat.cli import main

raise SystemExit(main())
