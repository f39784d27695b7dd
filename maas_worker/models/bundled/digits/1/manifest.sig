{
  "key_id": "14e4784c3d697ba62a57177d09d83fcb",
  "signature": "cXQv8QyE0gPNH0wLG6wIv8GqqcF40ONa/gk5rOLsY+hp6VmbLMAhkFkhM1L3W1+OaU77WCx7geynxZOyQPWHDw=="
}
