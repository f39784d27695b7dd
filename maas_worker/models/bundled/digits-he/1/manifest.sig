{
  "key_id": "87f21bd575e62ea9c5ba112ff99bb7e6",
  "signature": "LQrBNBHuohoKy7veSYnF+wj7Bq3evN3BFnORfat+CLco/Iyv//uOodrKLFvzkUelvmkm0mF78VbNDhcCfnXxDA=="
}
